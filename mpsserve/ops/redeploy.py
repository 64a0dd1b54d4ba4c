"""``python -m mpsserve.ops.redeploy --config FILE``: a ``ray job submit`` redeploy's entrypoint.

It is ``mpsserve deploy`` (mpsserve/ops/deploy.py: logs what the deploy changes and what
Serve will restart for it, deploys, then logs the endpoints and what runs), so the job's log
says what changed, what restarted and what came up.
"""

from __future__ import annotations

import argparse
import sys

from mpsserve.ops import deploy
from mpsserve.ops.cluster import ADDRESS_HELP, Watchdog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpsserve.ops.redeploy", description=__doc__)
    parser.add_argument("--config", required=True, help="service YAML or Serve config file")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    args = parser.parse_args(argv)
    return deploy.run_command("deploy", lambda: _redeploy(args.config, args.address))


def _redeploy(path: str, address: str | None) -> int:
    with Watchdog("deploy") as watchdog:
        deploy.deploy(path, address, watchdog)  # logs the plan first, what runs last
    return 0


if __name__ == "__main__":
    sys.exit(main())
