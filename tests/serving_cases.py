"""What the serving tests (tests/serving/) train, ask and compare: the run every method is
trained with, the prompts, how many tokens greedy answers are compared over, the API keys of
two organisations, and how a test asks a served client through the `openai` package."""

import openai
from tiny_run import TINY_RUN

# One round; a large learning rate so that two steps move the adapters visibly.
SERVED_RUN = [*TINY_RUN, "model.device=cpu", "optim.lr=0.02", "eval.max_new_tokens=4"]
# The methods the pool, API and export tests serve have four clients; every other method's run
# (only loaded back, one client) keeps the tiny run's two, which halves its training.
SERVED_METHODS = ("fedamole", "fedit", "feddpa")
CLIENTS = 4
PROMPTS = ["What is 12 plus 30?", "Name a colour.", "Sort: pear apple fig", "Say hello"]
MAX_TOKENS = 6
KEYS = {"sk-org-zero-0000": ["client-0"], "sk-org-one-11111": ["client-1", "client-2"]}


def chat(client: openai.OpenAI, model: str, prompt: str) -> str:
    """A greedy chat answer of at most MAX_TOKENS tokens to one user message."""
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.usage.completion_tokens <= MAX_TOKENS
    return answer.choices[0].message.content


def key_for(model: str) -> str:
    """The key of the organisation that may use ``model``."""
    return next(key for key, models in KEYS.items() if model in models)
