"""Generator scripts for the reference numbers in tests/data (run by hand, never by pytest).

Scripts named ``make_sinddm_official_*`` import the official SinDDM code from a checkout given
on the command line and write only numbers that this code computed; ``make_sinddm_own_*``
records numbers of the pack's own variants.  The official code is never copied here.
"""
