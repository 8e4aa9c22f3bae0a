"""Workspace-service tests, against real PostgreSQL, real git, real processes and real
gRPC servers on port 0.

Reference ``paperclip-workspace-service.md`` §12, scenario by scenario (tests are named
``test_scenario_<n>_...``):

- 1, 32 (reuse-eligible listing): ``test_workspaces_api``. The summary projection of
  scenario 1 and ``clearEnvironmentSelection`` of 32 have no counterpart: lists return
  whole workspaces, and the environment is a config key changed with UpdateExecutionWorkspace.
- 3, 31: ``test_close_archive``; 6: ``test_control``; 8, 10, 11: ``test_workspaces_api``
  (8 as an agent creating a workspace with commands: we have no project RPCs).
- 12, 27, 28, 30: ``test_workspace_config``; 13-17, 20: ``test_git_worktree``; 18, 19:
  ``test_cleanup`` (18 also through ArchiveExecutionWorkspace in ``test_close_archive``).
- 21, 29: ``test_runtime_restart``; 24, 25, 28: ``test_runtime_services``; 26:
  ``test_control``; 33-35: ``test_leases``.

Not applicable:

- 2: there is no workspace-overview RPC (its paging rules are AIP-132's, tested on
  every List).
- 4, 5: the reopen lifecycle lock and reconcile-branch are of the unconfirmed "ext"
  code.
- 7, 9: project workspaces have no RPCs here; agents are refused every host-executed
  command (8, 10) and need an open issue of their own to control any workspace (6).
- 22, 23: services scoped to a run or shared across project worktrees by reuse key; our
  runtime services belong to one execution workspace and are started explicitly.
- 35 in part: ``ReleaseRunLeases`` refuses a run that has not ended
  (``RUN_NOT_TERMINAL``) instead of terminalizing it: the run service owns run status
  and always commits the terminal status first.
- 36: sandbox providers and images; only the ``local`` lease provider exists.
"""
