#!/usr/bin/env bash
# Would the newest releases that pyproject.toml's ranges allow break us? Builds a throwaway venv
# from the ranges (not the lock), prints which packages moved from requirements/dev.txt, runs the
# suite there (arguments go to pytest, e.g. `tests/test_eval.py -x`) and prints what failed.
# Not part of CI. If it passes, `bash scripts/update_lock.sh --upgrade` moves the lock; if not,
# add the upper bound that is needed to pyproject.toml (with a comment saying why).
# On the CPU machines pip caps torch/torchvision at the builds on their disk (/etc/xdg/pip).
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/aim-llava-latest.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -e ".[dev]" \
  || { echo "check_latest: the newest releases the ranges allow do not install together" >&2; exit 1; }

"$venv/bin/python" - requirements/dev.txt <<'PY'
import re, subprocess, sys
from packaging.utils import canonicalize_name as name

def pins(lines):
    found = (re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line) for line in lines)
    return {name(m[1]): m[2] for m in found if m}

locked = pins(open(sys.argv[1]).read().splitlines())
freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                        capture_output=True, text=True, check=True).stdout.splitlines()
latest = pins(freeze)
moved = [f"  {p}: {locked[p]} -> {latest[p]}" for p in sorted(locked.keys() & latest.keys()) if locked[p] != latest[p]]
added = [f"  {p}=={latest[p]} (not in the lock)" for p in sorted(latest.keys() - locked.keys()) if p not in ("pip", "setuptools")]
gone = [f"  {p}=={locked[p]} (no longer installed)" for p in sorted(locked.keys() - latest.keys())]
print("packages that moved from requirements/dev.txt:")
print("\n".join(moved + added + gone) or "  none")
PY

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" -m pytest -q -rfE -p no:cacheprovider "${@:-tests}"
status=$?
if [[ $status == 0 ]]; then
  echo "check_latest: the suite passes with the newest releases; 'bash scripts/update_lock.sh --upgrade' may move the lock"
else
  echo "check_latest: the suite FAILS with the newest releases (above); keep the lock, bound what broke in pyproject.toml" >&2
fi
exit $status
