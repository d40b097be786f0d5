"""The one kind of error a user can fix, on either side of the trust boundary.

A bad scenario, an unknown setting, a site folder without a usable manifest, a missing
data folder, an output folder that holds something else, a run folder that cannot be
resumed with these settings, a study in which every site failed for its own data: each
is raised as a `UserError` (or a subclass), whose message is one sentence naming the
file or setting and what would work. The `fedir` command prints that sentence on one
line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping


class UserError(Exception):
    """An error the user can fix; its message is the one line `fedir` prints."""


class MissingData(UserError, FileNotFoundError):
    """A data folder or file the command needs is not there."""


class OutputExists(UserError, FileExistsError):
    """The output folder holds something this command will not overwrite."""


class BadParameter(UserError, ValueError):
    """A command's parameter outside the range it can take (a ValueError to Python callers)."""


class StudyFailed(UserError):
    """The study cannot go on: no site could take part, or no evaluation was recorded.

    Raised at the coordinator with the sites' own reasons, after the run store, summary.json
    and report.html have recorded the run as failed.
    """

    @classmethod
    def no_site(cls, stage: str, failed: Mapping[str, str]) -> StudyFailed:
        """`no site could <stage>`, each distinct reason once with the sites that gave it."""
        sites_of: dict[str, list[str]] = {}
        for site, reason in failed.items():
            sites_of.setdefault(reason, []).append(site)
        reasons = "; ".join(f"{', '.join(sorted(sites))}: {reason}" for reason, sites in sites_of.items())
        return cls(f"no site could {stage} ({reasons or 'no site replied'})")
