"""``python -m lightning_sustain.data <keygen|encrypt|verify|rotate-key> ...``."""

import sys

from lightning_sustain.data.commands import main

sys.exit(main())
