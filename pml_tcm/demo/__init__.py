"""The open-world demo behind ``pml-tcm demo``: not part of the library's API.

Train a pml loss without and with TCM on the seen classes 0-4 of a data set, then measure
R@1, MAP@R, OPIS and ε-OPIS on the unseen classes 5-9. One module per step:

* :mod:`~pml_tcm.demo.settings`: the demo's defaults (the TCM setting of each data set and
  loss chosen on validation classes) and the checks that run before anything is trained;
* :mod:`~pml_tcm.demo.data`: the open-world splits (scikit-learn digits, Fashion-MNIST);
* :mod:`~pml_tcm.demo.models`: the small trunk and embedder networks;
* :mod:`~pml_tcm.demo.experiment`: one arm (loss, with or without TCM, seed) trained with a
  pml trainer and evaluated with a pml tester;
* :mod:`~pml_tcm.demo.results_table`: the table and its plain-language reading;
* :mod:`~pml_tcm.demo.utility_figure`, :mod:`~pml_tcm.demo.embedding_circle`: the figures;
* :mod:`~pml_tcm.demo.benchmark`: every arm, then the table and the figures in one folder;
* :mod:`~pml_tcm.demo.progress`: one progress line per arm, pml's bars kept quiet;
* :mod:`~pml_tcm.demo.command`: ``pml-tcm demo`` itself.

The demo needs the ``examples`` extra (scikit-learn for the digits, matplotlib for the
figures): ``pip install 'pml-tcm[examples]'``. Importing this package needs neither.
"""
