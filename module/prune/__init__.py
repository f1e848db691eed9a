"""Structured pruning: removing MLP neurons, attention heads, decoder layers or hidden channels, one width per
structure in every layer, so the result loads with plain `from_pretrained`.

- importance.py: the importance pass (one forward/backward per batch; neuron Taylor sums, activation norms);
- taps.py: the same pass's statistics of heads, layers and hidden channels;
- criteria.py: every criterion for every structure (a new criterion goes here);
- plan.py: the sizes a request asks for and the kept sets the scores give;
- mix.py, masks.py: the mix search (candidates, and their KL measured by masking the unpruned model);
- scores.py: a run's scores from the cache or the pass; output.py: cut, save, report; pipeline.py: the run;
- reconstruct.py (the layer walk), consumers.py, capture.py, refit.py, reselect.py: compensation after removal;
  compensation.py: how a run asks for it (--reconstruct*).
"""
