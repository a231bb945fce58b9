import sys, torch
sys.path.insert(0, ".")
from engine import dists
from engine.fast import FastOptions
from tests.test_population import population_config, population_learner

def run(greedy):
    if greedy:
        dists.sample_index = lambda probs: probs.detach().argmax(-1)
    _, members = population_config("env.image=false", "train.adam_eps=1e-3")
    pop, eager = population_learner(members, "cuda")
    pop2, graphed = population_learner(members, "cuda", FastOptions(cuda_graphs=True))
    graphed.step(True)
    sd1, sd2 = pop.state_dict(), pop2.state_dict()
    bad = [(k, (sd1[k].float() - sd2[k].float()).abs().max().item()) for k in sd1 if not torch.equal(sd1[k], sd2[k])]
    print("greedy", greedy, "state differing after capture undo:", len(bad), bad[:8])
    for i in range(3):
        torch.manual_seed(7 + i); want = eager.step(True)
        torch.manual_seed(7 + i); got = graphed.step(True)
        diffs = {k: (float(got[k].float().mean()), float(want[k].float().mean())) for k in want if k in got}
        worst = sorted(diffs.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))[:6]
        print(" step", i, [(k, round(a, 6), round(b, 6)) for k, (a, b) in worst])

run(False)
run(True)
