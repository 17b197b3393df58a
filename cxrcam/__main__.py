from cxrcam.cli import main

main()
