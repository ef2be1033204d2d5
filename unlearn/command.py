"""The `unlearn` command's entry point (`python -m unlearn` too), free of heavy imports.

Importing `unlearn.cli` imports torch, the first ~2 s of every command. A Ctrl-C landing there
raised KeyboardInterrupt out of the console script's own import line, a 40-line traceback; caught
here, it ends as one at any later moment does: one line and exit 130.
"""

import sys


def entry() -> None:
    try:
        from unlearn.cli import entry as command
    except KeyboardInterrupt:
        print("unlearn: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    command()
