"""``python -m common.actor_headers``: signed actor headers for calling a service directly.

The services accept only calls that carry an actor signed with the internal key
(``PAPERCLIP_INTERNAL_KEY``, or the one generated under ``PAPERCLIP_HOME``). This prints
grpcurl ``-H`` arguments for an operator acting as an instance admin, a board member or
an agent; the signature is valid for a few minutes.

    grpcurl -plaintext $(python -m common.actor_headers admin) -d '{...}' ADDR METHOD
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.actor import Actor, ActorType, Role, sign_actor
from common.config import load_settings


def _actor(args: argparse.Namespace) -> Actor:
    if args.kind == "admin":
        return Actor(type=ActorType.BOARD, user_id=args.user, is_instance_admin=True)
    if args.kind == "board":
        return Actor(
            type=ActorType.BOARD,
            user_id=args.user,
            memberships={args.company: Role(args.role)},
        )
    return Actor(
        type=ActorType.AGENT, agent_id=args.agent, company_id=args.company, run_id=args.run
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print ``-H 'name: value'`` pairs for the actor described on the command line."""
    parser = argparse.ArgumentParser(prog="python -m common.actor_headers")
    sub = parser.add_subparsers(dest="kind", required=True)
    admin = sub.add_parser("admin", help="an instance-admin board user")
    admin.add_argument("--user", default="local-board")
    board = sub.add_parser("board", help="a board user of one company")
    board.add_argument("--user", default="local-board")
    board.add_argument("--company", required=True)
    board.add_argument("--role", choices=[r.value for r in Role], default="admin")
    agent = sub.add_parser("agent", help="an agent inside one of its runs")
    agent.add_argument("--agent", required=True)
    agent.add_argument("--company", required=True)
    agent.add_argument("--run", required=True)
    args = parser.parse_args(argv)
    settings = load_settings()
    headers = sign_actor(_actor(args), settings.internal_key)
    print(" ".join(f"-H {name}:{value}" for name, value in headers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
