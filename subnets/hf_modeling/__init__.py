"""Self-contained modelling code for per-layer sub-networks. These two files are copied into
every saved per-layer folder so that ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads it anywhere transformers is installed; they import nothing
from edgenas."""
