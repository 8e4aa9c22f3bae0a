"""Test agent: does its issue's work through the gateway, as a real agent would.

Checks out ``PAPERCLIP_ISSUE_ID`` (expecting todo or in_progress: the harness may have
checked it out for this run already), adds a comment, moves the issue to done and
exits 0. Uses only the typed client and the environment the run service provides.
"""

import asyncio
import os
import sys

from google.protobuf.field_mask_pb2 import FieldMask
from paperclip_client import PaperclipClient

from paperclip.issues.v1 import issues_pb2


async def main() -> int:
    issue_id = os.environ["PAPERCLIP_ISSUE_ID"]
    agent_id = os.environ["PAPERCLIP_AGENT_ID"]
    async with PaperclipClient.from_env() as client:
        issue = await client.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=issue_id,
                agent_id=agent_id,
                expected_statuses=[
                    issues_pb2.ISSUE_STATUS_TODO,
                    issues_pb2.ISSUE_STATUS_IN_PROGRESS,
                ],
            )
        )
        print(f"checked out {issue.identifier}", flush=True)
        await client.issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=issue_id, body="worker: done the work")
        )
        await client.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=issue_id, status=issues_pb2.ISSUE_STATUS_DONE),
                update_mask=FieldMask(paths=["status"]),
            )
        )
        print("moved to done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
