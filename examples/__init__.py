"""Example models of one's own, outside the zoo (see README "Your own model")."""
