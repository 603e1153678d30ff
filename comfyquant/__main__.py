"""``python -m comfyquant``: the same as the ``comfyquant`` command."""

import sys

from comfyquant.cli.main import main

sys.exit(main())
