#!/usr/bin/env bash
# The numerics tests (pytest marker `numerics`: two computations that round or sum in different orders, e.g.
# DDP/FSDP2/TP vs one process, per-row vs per-adapter, quantized vs dequantized, compiled vs eager, autocast)
# under instruction-set paths other than the machine's own, so that a tolerance that holds on one CPU only
# fails on every machine, not on some (issue 31). Each variant is one pytest run:
#   avx2      MKL, oneDNN and ATen held to AVX2 (an AVX2 machine; on an AVX-512 CPU the default run differs)
#   portable  ATen's and lora_ext's portable kernels (no vector code), MKL held to SSE4.2
# The machine's own path runs in the README's test command. ~2.5 min per variant here.
#
#   bash scripts/isa_matrix.sh [VARIANT ...] [-- PYTEST ARGS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
declare -A ENVS=(
  [avx2]="MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
  [portable]="MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default"
)
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#variants[@]} -gt 0 ] || variants=(avx2 portable)
for v in "${variants[@]}"; do
  [ -n "${ENVS[$v]:-}" ] || { echo "isa_matrix.sh: unknown variant '$v' (expected one of: ${!ENVS[*]})" >&2; exit 2; }
done
status=0
for v in "${variants[@]}"; do
  echo "[isa_matrix] $v: ${ENVS[$v]}" >&2
  # shellcheck disable=SC2086
  env ${ENVS[$v]} bash "$ROOT/scripts/run.sh" -m pytest tests -q -m numerics -p no:cacheprovider "$@" || status=1
done
exit $status
