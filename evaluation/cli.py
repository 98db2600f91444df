"""What every command line of the project shares (train.py's, the linear probe's): --help with each default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default, shown once: a help text that says its own (a rule, not a value) keeps it."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)
