"""``python -m lightning_sustain``: the same as the ``lightning-sustain`` command."""

from lightning_sustain.cli import main

raise SystemExit(main())
