#!/usr/bin/env bash
# Check the Triton kernels against one Triton release, without a GPU (not part of `make test`: slow).
#
#   bash bench/triton_versions.sh VERSION [VENV_DIR]     (default VENV_DIR: .venvs/triton-VERSION)
#   e.g. TORCH_SPEC=torch==2.13.0+cpu bash bench/triton_versions.sh 3.6.0
#
# The project supports Triton 3.6 to 3.9, while its own environment has one of them.
# This builds a virtual environment with triton==VERSION (pinned by a constraints
# file, so no dependency moves it; numpy<2.4 with Triton 3.6 and older, whose
# interpreter needs it) and a CPU torch (TORCH_SPEC, default "torch"),
# installs this repository into it, and runs the two checks a CPU machine can make:
#   1. the kernel tests (tests/kernels) through the interpreter (TRITON_INTERPRET=1),
#      one file at a time;
#   2. the static compile report, `python -m bench.compile --quick --details` (every
#      bf16 configuration built by the real compiler for sm_90 and sm_80).
# Then it prints a short summary: the tests' counts per file, the compile report's
# configurations, failures and spills, and for the sm_90 attention kernels at head
# dims 64/128 their TMA, warp specialization and HGMMA facts. Interpreter and
# compiler checks, not GPU runs. Logs and the compile JSON go to VENV_DIR/report/.
#
# VENV_DIR is created if it is absent, reused if this script made it (a marker file
# says so), and refused otherwise; nothing is ever deleted. Set TESTS=0 or COMPILE=0
# to skip a check, PYTHON to choose the interpreter the environment is made from.
set -u
caller="$PWD"
cd "$(dirname "$0")/.."
root="$PWD"
version="${1:-}"
if [ -z "$version" ] || [ "$version" = "-h" ] || [ "$version" = "--help" ]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  [ -z "$version" ] && exit 2 || exit 0
fi
case "$version" in
  [0-9]*.[0-9]*) ;;
  *) echo "triton_versions.sh: VERSION must be a Triton release such as 3.6.0, got '$version'" >&2; exit 2 ;;
esac
venv="${2:-$root/.venvs/triton-$version}"
case "$venv" in /*) ;; *) venv="$caller/$venv" ;; esac
marker="$venv/.fastlm-triton-versions"
python="${PYTHON:-python3}"

if [ -e "$venv" ] && [ ! -f "$marker" ]; then
  echo "triton_versions.sh: $venv exists and was not made by this script; name another VENV_DIR" >&2
  exit 2
fi
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "triton==$version ready" ]; then
  echo "== building $venv (triton==$version, ${TORCH_SPEC:-torch})"
  if [ ! -e "$venv" ]; then
    "$python" -m venv "$venv" || exit 1
  fi
  echo "triton==$version building" > "$marker"
  echo "triton==$version" > "$venv/constraints.txt"
  # Triton 3.6 and older: the interpreter reads loop bounds as int() of a 1-element array, which
  # NumPy 2.4 refuses (kernels._library.check_interpreter); 3.8 and 3.9 squeeze first.
  case "$version" in 2.*|3.[0-6]|3.[0-6].*) echo "numpy<2.4" >> "$venv/constraints.txt" ;; esac
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$venv/constraints.txt")
  "${pip[@]}" "${TORCH_SPEC:-torch}" "triton==$version" || exit 1
  # Pin the torch just installed too, then the repository and its dev dependencies around both.
  "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" >> "$venv/constraints.txt" || exit 1
  "${pip[@]}" -e "$root[dev]" || exit 1
  echo "triton==$version ready" > "$marker"
fi
py="$venv/bin/python"
report="$venv/report"
mkdir -p "$report"
export PYTHONPATH="$root" PYTHONUNBUFFERED=1
versions=$("$py" -c "import torch, triton; print(f'triton {triton.__version__}, torch {torch.__version__}')") || exit 1
echo "== $versions ($venv)"
case "$versions" in
  "triton $version,"*) ;;
  *) echo "triton_versions.sh: $venv has $versions, not triton $version" >&2; exit 1 ;;
esac

summary="$report/summary.txt"
echo "$versions; $(date -u +%Y-%m-%dT%H:%MZ)" > "$summary"
status=0
if [ "${TESTS:-1}" != 0 ]; then
  for file in tests/kernels/test_*.py; do
    name=$(basename "$file" .py)
    start=$SECONDS
    env TRITON_INTERPRET=1 "$py" -m pytest "$file" -q -p no:cacheprovider > "$report/$name.log" 2>&1 || status=1
    echo "$file: $(tail -n 1 "$report/$name.log" | tr -d '=' | sed 's/^ *//') ($((SECONDS - start)) s)" | tee -a "$summary"
  done
fi
if [ "${COMPILE:-1}" != 0 ]; then
  env -u TRITON_INTERPRET "$py" -m bench.compile --quick --details --json "$report/compile.json" \
    > "$report/compile.log" 2>&1 || status=1
  "$py" - "$report/compile.json" <<'EOF' | tee -a "$summary" || status=1
import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
bad = [r for r in rows if "error" in r]
spills = [r for r in rows if r.get("spill_bytes", 0) > 0]
hot = [r for r in spills if r["hot"]]
print(f"bench.compile --quick: {len(rows)} configurations, {len(bad)} failed to compile, {len(spills)} spill "
      f"({len(hot)} hot)")
for r in bad:
    print(f"  FAILED {r['kernel']} {r['config']} {r['target']}: {r['error']}")
for r in spills:
    print(f"  SPILLS {r['spill_bytes']} bytes: {r['kernel']} {r['config']} {r['target']}")
for kernel in ("_attn_fwd_tma_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
    for d in (64, 128):
        group = [r for r in rows if r["kernel"] == kernel and r["target"] == "sm_90" and f" D={d} " in r["config"]
                 and "sass" in r]
        if not group:
            continue
        ws = [r for r in group if r["sass"]["warp_specialized"]]
        shapes = sorted({s for r in group for s in r["sass"]["hgmma"]})
        print(f"  sm_90 {kernel} D={d}: {len(group)} configs, TMA in {sum(r['sass']['utmaldg'] > 0 for r in group)}, "
              f"warp-specialized {len(ws)} (setmaxnreg {sorted({n for r in ws for n in r['sass']['setmaxnreg']})}), "
              f"HGMMA in {sum(bool(r['sass']['hgmma']) for r in group)} ({', '.join(shapes)}), "
              f"regs {min(r['regs'] for r in group)}-{max(r['regs'] for r in group)}")
EOF
fi
echo "== summary in $summary; logs and compile.json in $report"
exit $status
