"""Test agent: ``comment_storm.py MARKER`` posts one comment on its run's issue as a board
user (``STORM_USER``), straight to the issue service (``STORM_ISSUE_ADDR``, signed with
``STORM_KEY``), then exits 0: a comment that is not the run's own, so it wakes the agent
again. Posts nothing once ``STORM_MAX`` comments were posted (counted in ``STORM_COUNT``).
"""

import os
import sys
from pathlib import Path

import grpc

from common.actor import Actor, ActorType, Role, sign_actor
from paperclip.issues.v1 import issues_pb2, issues_pb2_grpc

counter = Path(os.environ["STORM_COUNT"])
posted = int(counter.read_text()) if counter.exists() else 0
if posted >= int(os.environ.get("STORM_MAX", "20")):
    sys.exit(0)
counter.write_text(str(posted + 1))
company = os.environ["PAPERCLIP_COMPANY_ID"]
actor = Actor(
    type=ActorType.BOARD, user_id=os.environ["STORM_USER"], memberships={company: Role.ADMIN}
)
with grpc.insecure_channel(os.environ["STORM_ISSUE_ADDR"]) as channel:
    issues_pb2_grpc.IssueServiceStub(channel).AddComment(
        issues_pb2.AddCommentRequest(
            issue_id=os.environ["PAPERCLIP_ISSUE_ID"], body=f"storm comment {posted + 1}"
        ),
        metadata=sign_actor(actor, os.environ["STORM_KEY"].encode()),
        timeout=10,
    )
print(f"posted storm comment {posted + 1}", flush=True)
