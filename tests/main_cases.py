"""Run ``experiments/main.py`` on many command lines, each in a forked child, and print
``[{"args", "code", "stderr", "left"}]`` as JSON: the exit code, what it wrote to stderr,
and whether its workdir exists afterwards.

One Python process imports everything once; each case then costs a fork, not a new
interpreter with JAX imported again. Used by test_main_errors.py:

    python tests/main_cases.py CASES.json SCRATCH_DIR
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import main  # noqa: E402
import ratebp_jax.train  # noqa: E402,F401  (imported before forking, once)


def run_case(args, workdir, stderr_path):
    pid = os.fork()
    if pid == 0:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 0
        try:
            sys.argv = ["main.py", "--workdir", workdir, *args]
            main.run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported as a traceback by the parent
            import traceback
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(stderr_path) as f:
        return os.waitstatus_to_exitcode(status), f.read()


def main_(cases_path, scratch):
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for i, args in enumerate(cases):
        workdir = os.path.join(scratch, f"run{i}")
        code, stderr = run_case(args, workdir, os.path.join(scratch, f"stderr{i}"))
        results.append({"args": args, "code": code, "stderr": stderr,
                        "left": os.path.exists(workdir)})
    print(json.dumps(results))


if __name__ == "__main__":
    main_(*sys.argv[1:])
