"""The one base class of the course's errors: a problem a person can fix, with a message that says how.

Every stage raises a subclass of `CourseError` (ConfigError, DatasetError, TrainingError, ...) for bad input or a
state it refuses, its message naming the file, row, flag or setting and what to do. The command line prints such
an error as one line (`error: ...`) and exits with status 1, never with a traceback; anything else is a bug.
"""


class CourseError(Exception):
    """Bad input or a refused state; the message names what and says what to do."""


class TrainingError(CourseError, RuntimeError):
    """Training cannot go on, or a checkpoint is refused; the message says why and what to change."""
