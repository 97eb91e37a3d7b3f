import sys

try:
    from qflare.cli import app
except KeyboardInterrupt:  # Ctrl-C while torch and the CLI load: one line, no traceback
    sys.stderr.write("interrupted while starting\n")
    sys.exit(130)

app()
