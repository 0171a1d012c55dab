from clvr.cli import main

main()
