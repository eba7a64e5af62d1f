"""Install flashtrain and its test tools into the virtual environment that runs this
script: ``make install`` (and so ``make run`` and ``make test``) calls it.

uv installs the same packages as pip, from the same places, in a fraction of the time
(pip unpacks the 3 GB of CUDA libraries one file at a time and compiles the modules one
after another). uv does not read pip's configuration, so the package sources pip is
configured with (``pip config list``: find-links, index-url, extra-index-url,
constraint) are passed to it, and it takes the best version over all of them, as pip
does. Like pip, it compiles every module to bytecode at install: left to the first
import, the compiling fell on the first workers a test suite or a run starts, all at
once, and a worker took longer than a minute to start. Where uv cannot be installed or
fails, pip does the install.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

TARGET = ["--editable", ".[dev]"]


def pip_sources() -> list[str]:
    """uv's arguments for the package sources pip is configured with."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=False).stdout
    flags = {"find-links": "--find-links", "index-url": "--index-url",
             "extra-index-url": "--extra-index-url", "constraint": "--constraint"}
    args: list[str] = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        flag = flags.get(key.rsplit(".", 1)[-1])
        if flag is None:
            continue
        for item in shlex.split(value.strip().strip("'\"")):
            if item not in args:  # pip lists a setting once per place it is set
                args += [flag, item]
    return args


def main() -> int:
    quiet = ["--quiet"]
    got_uv = subprocess.run([sys.executable, "-m", "pip", "install", *quiet, "uv"],
                            check=False).returncode == 0
    if got_uv:
        command = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable,
                   *quiet, "--index-strategy", "unsafe-best-match", "--compile-bytecode",
                   *pip_sources(), *TARGET]
        if subprocess.run(command, check=False).returncode == 0:
            return 0
        print("install: uv failed (above); installing with pip instead", file=sys.stderr)
    else:
        print("install: could not install uv; installing with pip instead", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "pip", "install", *quiet, *TARGET],
                          check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
