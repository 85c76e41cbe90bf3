"""torchrun for machines without torch: `torchrun_standin.py --nproc_per_node N --master_port P -m MODULE ARGS...`

Sets what torchrun 2.x sets for each worker (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True) and, like torchrun's agent, holds MASTER_PORT
open for its own store while the workers run. Exits with the first failing worker's status."""

import argparse
import os
import socket
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc_per_node", type=int, required=True)
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("-m", dest="module", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    with socket.create_server((args.master_addr, args.master_port)):  # the agent's TCP store
        workers = []
        for rank in range(args.nproc_per_node):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc_per_node),
                       LOCAL_WORLD_SIZE=str(args.nproc_per_node), GROUP_RANK="0", MASTER_ADDR=args.master_addr,
                       MASTER_PORT=str(args.master_port), TORCHELASTIC_USE_AGENT_STORE="True")
            workers.append(subprocess.Popen([sys.executable, "-u", "-m", args.module, *args.args], env=env))
        codes = [w.wait() for w in workers]
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    raise SystemExit(main())
