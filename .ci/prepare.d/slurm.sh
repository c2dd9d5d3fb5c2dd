#!/usr/bin/env bash
# A single-node SLURM cluster (slurm-wlm + munge, installed when missing) for tests/integration/test_slurm_*.py.
# Started here rather than inside pytest so the one-time apt install is not counted against test timeouts.
# The tests start it themselves when this did not run, and skip with the script's reason where it cannot start.
exec bash "$(dirname "$0")/../../tests/slurm/start_cluster.sh"
