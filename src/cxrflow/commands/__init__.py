"""One thin module per ``cxrflow`` subcommand: its options (``add_arguments``) and what it prints (``run``).

The pipeline's work is done by the stage modules below (data, modelling, results); a command parses,
checks what it can before importing torch, scikit-learn or pyspark, calls the stage and words the result
for people.
"""
