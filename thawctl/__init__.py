"""thawctl: the operator's command line for thawd and the `thawctl top` dashboard.

`thawctl --help` lists the commands; docs/THAWCTL.md documents them, their --json schemas and
exit codes. The CLI and the dashboard use only the public client library (thaw.client) and
render its immutable records; they never import thawd.
"""

__version__ = "0.1.0"
