"""Create the virtual environment that `make` installs llmship into (used when no virtualenv or conda env is active).

Debian 12 / Ubuntu 23.04+ mark their system Python externally managed (PEP 668): `pip install` into it is refused,
so the Makefile never installs there. Some of those systems also lack the `python3-venv` package, whose absence makes
`python -m venv` fail for want of ensurepip's bundled pip; then the venv is created without pip and pip is installed
into it from its wheel on the package index, the one network source a fresh machine is allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
import venv
from pathlib import Path
from urllib.parse import urljoin

SUPPORTED = ((3, 10), (3, 12))  # pyproject's requires-python
PIP_JSON = "https://pypi.org/pypi/pip/json"


def check_python() -> None:
    low, high = SUPPORTED
    if not low <= sys.version_info[:2] <= high:
        sys.exit(f"make: llmship needs Python {low[0]}.{low[1]}-{high[0]}.{high[1]}; {sys.executable} is "
                 f"{sys.version.split()[0]}. Run e.g. `make test PYTHON3=python3.11`.")


def bootstrap_pip(python: Path) -> None:
    with urllib.request.urlopen(PIP_JSON, timeout=60) as response:
        release = json.load(response)
    wheel = next(f for f in release["urls"] if f["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / wheel["filename"]
        with urllib.request.urlopen(urljoin(PIP_JSON, wheel["url"]), timeout=180) as response:
            path.write_bytes(response.read())
        # A pip wheel runs from the zip itself: `python pip.whl/pip install pip.whl`.
        subprocess.run([str(python), f"{path}/pip", "install", "-q", str(path)], check=True)


def main() -> None:
    check_python()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv")
    python = target / "bin" / "python"
    try:
        venv.create(target, with_pip=True, clear=True)
    except subprocess.CalledProcessError:
        print(f"make: ensurepip is missing from {sys.executable} (Debian's python3-venv); installing pip from its wheel",
              file=sys.stderr)
        venv.create(target, with_pip=False, clear=True)
        bootstrap_pip(python)
    print(f"make: created {target} with {sys.version.split()[0]}; llmship installs there (activate: . {target}/bin/activate)")


if __name__ == "__main__":
    main()
