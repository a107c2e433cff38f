"""Learning: the network and its layer groups, the learner and its loop, SGDR schedules, the lr finder, precomputed activations, history, exact resume and the distributed collectives."""
