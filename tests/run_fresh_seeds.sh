#!/usr/bin/env bash
# Every test must hold for any seed, not only under CI's derandomized profile. Not run by CI (minutes).
# Runs the given test files (default: every file with a Hypothesis @given, the spec included) under N fresh
# random Hypothesis seeds of the default profile, then once under the nightly profile (500 examples).
#   tests/run_fresh_seeds.sh [-n N] [--no-nightly] [FILES...]
set -u
cd "$(dirname "$0")/.."
n=5 nightly=1
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    --no-nightly) nightly=0; shift ;;
    *) break ;;
  esac
done
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(grep -l -e "@given" -e "PROPERTIES" tests/test_*.py tests/crosscheck/test_*.py)
export OPENBLAS_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for i in $(seq "$n"); do
  seed=$(python -c "import secrets; print(secrets.randbits(64))")
  echo "== default profile, --hypothesis-seed=$seed"
  HYPOTHESIS_PROFILE=dev python -m pytest -q -p no:cacheprovider --hypothesis-seed="$seed" "${files[@]}" \
    || status=1
done
if [ "$nightly" = 1 ]; then
  echo "== nightly profile"
  HYPOTHESIS_PROFILE=nightly python -m pytest -q -p no:cacheprovider "${files[@]}" || status=1
fi
exit $status
