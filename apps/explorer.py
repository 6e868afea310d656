"""Streamlit entry point: `streamlit run apps/explorer.py -- --store DIR [--model M --sae S]`.

The pages live in the package (`dlmscope/explorer.py`) so `dlmscope explore` works from any install.
"""

from dlmscope.explorer import main

main()
