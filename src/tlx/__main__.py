from tlx.cli import main

main()
