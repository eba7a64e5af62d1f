#!/bin/bash
# flashtrain on a SLURM cluster as one batch job: Ray on every allocated node, the training
# job on them, Ray stopped at the end (also when the job fails or is cancelled).
#
#   make install                                              # once, on the login node
#   sbatch cluster/slurm/job.sh --config jobs/paper-abci.yaml # from the checkout
#
# Arguments after the script go to python -m flashtrain.jobs.imagenet. Edit the #SBATCH
# lines for your cluster (partition, account, nodes, GPUs and CPUs per node, time) or
# override them on the command line: `sbatch -N 4 -t 2:00:00 -p gpu cluster/slurm/job.sh`.
#SBATCH --job-name=flashtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --output=flashtrain-%j.out
# SIGTERM to the launcher 2 minutes before the time limit: the job stops at a step
# boundary (resume with --resume --run-dir) and Ray is stopped on every node.
#SBATCH --signal=B:TERM@120

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit from the flashtrain checkout}"

JOB_ARGS=("$@")
if [ ${#JOB_ARGS[@]} -eq 0 ]; then JOB_ARGS=(--config jobs/paper-abci.yaml); fi
GPUS_PER_NODE=${SLURM_GPUS_PER_TASK:-8}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-64}

# The scheduler-specific part: the host list, and one job step per host that holds the
# node's CPUs and GPUs for Ray (srun since Slurm 22.05 does not pass --cpus-per-task on).
exec .venv/bin/python -m flashtrain.launch \
    --hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST")" \
    --remote-exec "srun --nodes=1 --ntasks=1 --cpus-per-task=$CPUS_PER_NODE --gpus-per-task=$GPUS_PER_NODE --overlap -w {host} bash -c {command}" \
    --job-id "$SLURM_JOB_ID" \
    --gpus-per-node "$GPUS_PER_NODE" \
    --cpus-per-node "$CPUS_PER_NODE" \
    -- "${JOB_ARGS[@]}"
