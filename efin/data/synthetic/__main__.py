"""python -m efin.data.synthetic --root DIR: generate the corpus ahead of training."""

from efin.data.synthetic.cli import main

main()
