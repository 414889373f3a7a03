from flashmhf.cli import main

main()
