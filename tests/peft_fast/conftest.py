import os

AGAINST_PEFT = os.environ.get("PEFT_FAST_TESTS_AGAINST_PEFT") == "1"
