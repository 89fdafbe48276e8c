"""The helpers of the stepkto stages (generate.py, label.py, train.py, evaluate.py at the top level): one module
per concern, none of which imports a stage."""
