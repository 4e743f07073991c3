#!/usr/bin/env bash
# Create a W&B sweep and start agents on it. Needs the W&B service (network + `wandb login`);
# on a cluster without network use the Hydra route (make sweep) and `wandb sync` instead.
#
#   bash experiments/wandb/launch.sh [SWEEP] [options]
#     SWEEP             grid | bayes | path/to/sweep.yaml            (default: grid)
#     --sweep-id ID     start agents on an existing sweep (entity/project/id) instead
#     --agents N        agents on this machine, each running until the sweep is done  (1)
#     --count N         runs per local agent (default: until the sweep is done)
#     --slurm           submit a SLURM array instead: one `wandb agent --count 1` per task
#     --runs N          array size (default: the grid's size; run_cap for other methods)
#     --parallel P      array tasks running at once                                    (16)
#     --partition P     SLURM partition (default: the cluster's)
#     --project P       W&B project (default: the sweep file's `project`, else nanlab)
#     --entity E        W&B entity (default: your default entity)
#     --dry-run         print what would be run, run nothing
# Every agent run calls `python -m experiments.wandb.run_cell cell="<overrides>" ...` (the
# sweep file's `command`), which runs `python -m src.train experiment=nan_map_base <overrides>
# ...` and writes outputs/wandb_sweeps/<sweep id>/<run id>/record.json. grid.yaml holds the
# default map's cells (experiments/wandb/make_grid.py); it must be up to date to be launched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# The agent runs `/usr/bin/env python`: make that the project's interpreter.
if [[ -x "$ROOT/.venv/bin/python" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
export HF_HUB_OFFLINE=1

sweep="grid"; sweep_id=""; agents=1; count=""; slurm=0; runs=""; parallel=16
partition=""; project=""; entity=""; dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sweep-id) sweep_id="$2"; shift 2 ;;
    --agents) agents="$2"; shift 2 ;;
    --count) count="$2"; shift 2 ;;
    --slurm) slurm=1; shift ;;
    --runs) runs="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --entity) entity="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "launch.sh: unknown option $1" >&2; exit 2 ;;
    *) sweep="$1"; shift ;;
  esac
done

case "$sweep" in
  grid|bayes) file="experiments/wandb/$sweep.yaml" ;;
  *) file="$sweep" ;;
esac

run() { echo "+ $*" >&2; if [[ $dry -eq 0 ]]; then "$@"; fi; }

# How many runs a sweep file asks for: the grid's size, else its run_cap.
sweep_size() {
  python - "$1" <<'PY'
import math, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
if cfg.get("method") == "grid":
    params = cfg.get("parameters", {})
    print(math.prod(len(p["values"]) if "values" in p else 1 for p in params.values()))
else:
    print(cfg.get("run_cap", ""))
PY
}

if [[ -z "$sweep_id" ]]; then
  [[ -f "$file" ]] || { echo "launch.sh: no sweep file $file" >&2; exit 2; }
  # the grid must sweep the map's cells as conf/ defines them now
  if [[ "$(realpath "$file")" == "$(realpath experiments/wandb/grid.yaml)" ]]; then
    python -m experiments.wandb.make_grid --check >/dev/null || exit 2
  fi
  args=(sweep)
  [[ -n "$project" ]] && args+=(--project "$project")
  [[ -n "$entity" ]] && args+=(--entity "$entity")
  if [[ $dry -eq 1 ]]; then
    echo "+ wandb ${args[*]} $file" >&2
    sweep_id="ENTITY/PROJECT/SWEEP_ID"
  else
    # `wandb sweep` prints "Run sweep agent with: wandb agent entity/project/id" on stderr.
    out="$(wandb "${args[@]}" "$file" 2>&1)" || { echo "$out" >&2; exit 1; }
    echo "$out" >&2
    sweep_id="$(printf '%s\n' "$out" | sed 's/\x1b\[[0-9;]*m//g' \
      | sed -n 's/.*wandb agent \([^ ]*\).*/\1/p' | tail -n 1)"
    [[ -n "$sweep_id" ]] || { echo "launch.sh: could not read the sweep id above" >&2; exit 1; }
  fi
  [[ -z "$runs" ]] && runs="$(sweep_size "$file")"
fi
echo "sweep: $sweep_id" >&2
[[ -n "$runs" ]] && echo "runs: $runs" >&2

if [[ $slurm -eq 1 ]]; then
  [[ -n "$runs" ]] || { echo "launch.sh: --runs N is needed for this sweep" >&2; exit 2; }
  run mkdir -p outputs/wandb_sweeps/slurm    # sbatch does not create the log directory
  sargs=(--array="0-$((runs - 1))%$parallel")
  [[ -n "$partition" ]] && sargs+=(--partition="$partition")
  run sbatch "${sargs[@]}" experiments/wandb/agent.sbatch "$sweep_id"
  exit 0
fi

agent=(wandb agent)
[[ -n "$count" ]] && agent+=(--count "$count")
if [[ "$agents" -le 1 ]]; then
  run "${agent[@]}" "$sweep_id"
else
  pids=()
  for _ in $(seq "$agents"); do
    run "${agent[@]}" "$sweep_id" & pids+=("$!")
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  exit $status
fi
