"""One exception type for user-facing problems: the CLI and dodo print its one line."""


class BuildError(Exception):
    """A problem with the user's input or setup. str(e) is one line: what and what to do."""
