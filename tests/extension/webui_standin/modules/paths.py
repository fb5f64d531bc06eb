import os

models_path = os.environ.get("STANDIN_MODELS", os.path.join(os.getcwd(), "models"))
script_path = os.environ.get("STANDIN_ROOT", os.getcwd())
