"""``python -m pml_tcm``: the ``pml-tcm`` command line."""

from .cli import main

raise SystemExit(main())
