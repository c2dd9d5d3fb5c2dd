"""Run several ``g3dr`` command lines in one process, so the imports are paid once: ``python cli_cases.py
CASES.json OUT.json``. CASES.json is a list of argument lists; OUT.json gets, per case, the exit code and what the
command wrote to stderr (an exception the CLI let through is reported as rc "raised" with its traceback).

Used inside a private mount namespace (``fs_faults.run_with_tmpfs``), where each case meets real EROFS or ENOSPC.
"""

import contextlib
import io
import json
import sys
import traceback

from g3dr.launchers.main import main

cases = json.loads(open(sys.argv[1]).read())
results = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:
            rc = exit_.code
        except BaseException:  # noqa: BLE001 - reported to the test
            rc = "raised"
            traceback.print_exc(file=err)
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
