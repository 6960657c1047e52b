"""The one error type for problems the user can fix, and the exit codes that scripts branch on.

Anything that is not a QloraError is a bug and keeps its traceback. The message is for people and may
be reworded at any time; the exit code is for scripts (scripts/train-resilient.sh) and is a contract.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What each exit status of `qlora` means, and what a script should do next."""

    OK = 0
    USER_ERROR = 1  # the recipe, data, folders or options need a fix; the message says which
    USAGE = 2  # the command-line parser (click) refused the command line
    DOES_NOT_FIT = 3  # plan: the predicted peak memory exceeds --gpu-memory
    RUN_INTERRUPTED = 10  # train: train.output_dir holds an interrupted run; run again with --resume
    RUN_EXISTS = 11  # train: train.output_dir holds a qlora run with nothing to continue; --resume or --force
    NOTHING_TO_RESUME = 12  # train --resume: train.output_dir holds no qlora run; train without --resume
    NO_CHECKPOINT = 13  # train --resume: the run saved no complete checkpoint; start over with --force
    DIVERGED = 14  # train: the loss became non-finite; no adapter written; retrying repeats it
    CRASH = 70  # an unexpected exception, traceback printed (sysexits' EX_SOFTWARE): worth a retry
    INTERRUPTED = 130  # SIGINT (128 + 2); train saved a checkpoint first, so --resume continues
    TERMINATED = 143  # SIGTERM (128 + 15), e.g. a spot machine's notice; as for SIGINT


class QloraError(Exception):
    """A message that names what is wrong (key, row, file or adapter) and how to fix it.

    `exit_code` tells scripts which kind of problem it is; most are plain USER_ERROR."""

    def __init__(self, message: str, *, exit_code: ExitCode = ExitCode.USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code
