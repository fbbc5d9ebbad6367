"""Run Debian 12's getmail6 (6.18.11) without its lost-SIGCHLD race.

getmail forks a child per delivered message, then installs a SIGCHLD handler and waits on a
condition the handler notifies. A child that exits before the parent reaches the wait
leaves the notification lost and the parent waiting out its socket timeout, the message
failing ("waiting child pid ... timed out"; getmail6 issues #52, #226, #245). Upstream fixed
it by waiting for the child directly (multiprocessing's join). This launcher does the same:
no handler, a blocking waitpid() on the child. Under a loaded test machine the race hit
about one run in six; nothing else about getmail changes.

Usage: /usr/bin/python3 getmail_launcher.py /usr/bin/getmail ARGS...
(run by getmail's own interpreter, so it must work on any Python 3 alone).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def _patch() -> None:
    from getmailcore.baseclasses import ForkingBase
    from getmailcore.exceptions import getmailOperationError

    def _prepare_child(self: Any) -> None:
        pass  # no SIGCHLD handler: _wait_for_child reaps the child itself

    def _wait_for_child(self: Any, childpid: int) -> int:
        _pid, status = os.waitpid(childpid, 0)
        if os.WIFSIGNALED(status):
            raise getmailOperationError(
                f"child pid {childpid} killed by signal {os.WTERMSIG(status)}"
            )
        if not os.WIFEXITED(status):
            raise getmailOperationError(f"child pid {childpid} failed to exit")
        return os.WEXITSTATUS(status)

    ForkingBase._prepare_child = _prepare_child
    ForkingBase._wait_for_child = _wait_for_child


if __name__ == "__main__":
    _patch()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
