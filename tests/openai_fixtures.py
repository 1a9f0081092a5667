"""What the OpenAI-endpoint tests share: the prompts and answers of the ``served`` fixture (``conftest.py``)."""

PROMPT = "the plot of the film was"
ANSWERS = {"gen_a": "superb and moving", "gen_b": "dull tedious mess"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}was {% endif %}"
CHAT = [{"role": "user", "content": "the plot of the film"}]
