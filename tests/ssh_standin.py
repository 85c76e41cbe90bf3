"""ssh for tests: `ssh_standin.py HOST COMMAND` runs COMMAND with /bin/sh on this machine, in a clean
environment as sshd would (PATH, HOME, USER, LANG only), and appends HOST to $SSH_STANDIN_LOG."""

import os
import sys


def main() -> None:
    host, command = sys.argv[1], " ".join(sys.argv[2:])
    if os.environ.get("SSH_STANDIN_LOG"):
        with open(os.environ["SSH_STANDIN_LOG"], "a") as log:
            log.write(host + "\n")
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LANG") if k in os.environ}
    os.execve("/bin/sh", ["sh", "-c", command], env)


if __name__ == "__main__":
    main()
