"""The three ways a CYCLE_J command ends badly, each with its exit code (DESIGN.md "Exit codes")."""

from __future__ import annotations


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error's message, at most `limit` characters ("" for none): how a
    library's multi-line exception goes into a one-line CYCLE_J message."""
    for line in str(error).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


class CyclejError(Exception):
    """Base class: the message is one line meant for the user."""

    exit_code = 1


class BadInput(CyclejError):
    """The user's config, corpus or storage is wrong; nothing was computed. Exit code 2."""

    exit_code = 2


class StorageError(BadInput):
    """The artifact store cannot be reached or authenticated. Never a silent cache miss."""


class CorruptArtifact(CyclejError):
    """A file's checksum does not match its manifest."""


class StageFailed(CyclejError):
    """A stage failed at run time; the message names the stage and its resume point. Exit code 1."""

    def __init__(self, stage: str, reason: str, resume_point: str | None = None) -> None:
        self.stage = stage
        self.reason = reason
        self.resume_point = resume_point
        where = f"; resumes from {resume_point}" if resume_point else ""
        super().__init__(f"stage '{stage}' failed: {reason}{where}")
