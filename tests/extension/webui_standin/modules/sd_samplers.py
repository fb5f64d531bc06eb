from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])
all_samplers = [SamplerData(n, None, [], {}) for n in ("DPM++ 2M", "Euler a", "Euler", "DDIM")]


def visible_samplers():
    return list(all_samplers)
