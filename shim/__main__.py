"""``python -m shim``: the ``mmshim`` command (shim.app is the entry point)."""

import sys

from shim import signals

if sys.argv[1:2] == ["run"]:  # a SIGHUP or SIGTERM while the imports load must not kill us
    signals.hold()

from shim.app import main

raise SystemExit(main())
