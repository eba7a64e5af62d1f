#!/bin/bash
# flashtrain on ABCI 3.0 as one batch job: Ray on every allocated node, the training job
# on them, Ray stopped at the end (also when the job fails or is deleted).
#
#   cd ~/flashtrain && make install          # once, on the interactive node
#   qsub -P <your-group> cluster/abci/job.sh # from the checkout
#
# Edit: the #PBS lines (group, number of nodes, walltime), JOB_ARGS, and PYTHON_MODULE
# (the module the .venv was made with). qsub options on the command line override the
# #PBS lines, e.g. `qsub -P gxa50000 -l select=4 -l walltime=2:00:00 cluster/abci/job.sh`.
# rt_HF is a full node: 8 NVIDIA H200, 192 CPU cores. USE_SSH=1 lets the first node reach
# the others over ssh, which the launcher uses to start Ray there.
#PBS -q rt_HF
#PBS -l select=2
#PBS -l walltime=01:00:00
#PBS -P your-group
#PBS -v USE_SSH=1
#PBS -N flashtrain
#PBS -j oe

set -euo pipefail
cd "${PBS_O_WORKDIR:?submit from the flashtrain checkout}"

JOB_ARGS=(--config jobs/paper-abci.yaml)   # arguments of python -m flashtrain.jobs.imagenet
PYTHON_MODULE=python/3.12/3.12.9
GPUS_PER_NODE=8
SETUP="source /etc/profile.d/modules.sh && module load $PYTHON_MODULE"

eval "$SETUP"
# The scheduler-specific part: the host list and how to reach a host. Everything else is
# the shared launcher (flashtrain/launch.py).
exec .venv/bin/python -m flashtrain.launch \
    --hostfile "$PBS_NODEFILE" \
    --remote-exec "ssh -o BatchMode=yes {host} {command}" \
    --job-id "${PBS_JOBID%%.*}" \
    --gpus-per-node "$GPUS_PER_NODE" \
    --setup "$SETUP" \
    -- "${JOB_ARGS[@]}"
